-- A running generation job's partial output, written only by the worker that holds it, with its lease.
-- KEYS: job, events, active. ARGV: worker, lease until, changed (1/0), tokens, text, delta, out ids json,
-- the other samples' deltas (json [[index, text], ...]).
-- Returns 1 when cancellation was requested, 0 to go on, -1 when the job is no longer this worker's.
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[2], redis.call('HGET', KEYS[1], 'id'))
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'tokens', ARGV[4], 'text', ARGV[5], 'out_ids', ARGV[7])
end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'type', 'token', 'text', ARGV[6], 'tokens', ARGV[4])
end
if ARGV[8] and ARGV[8] ~= '[]' then
  for _, d in ipairs(cjson.decode(ARGV[8])) do
    redis.call('XADD', KEYS[2], '*', 'type', 'token', 'text', d[2], 'tokens', ARGV[4], 'index', tostring(d[1]))
  end
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
return 0
