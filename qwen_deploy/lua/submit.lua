-- KEYS: job, queue, idem ('' when none), active, pending ('' when the job is not for the engine).
-- ARGV: ttl, max_depth, message, job id, reap at, fields...
-- The record has no TTL until it is terminal (a job queued longer than the TTL must still end).
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate', ARGV[4]} end
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'duplicate', existing} end
end
local depth = redis.call('LLEN', KEYS[2])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[1], 'message', ARGV[3], unpack(ARGV, 6))
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
if KEYS[5] ~= '' then redis.call('ZADD', KEYS[5], redis.call('HGET', KEYS[1], 'created_at'), ARGV[4]) end
redis.call('LPUSH', KEYS[2], ARGV[3])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[1]) end
return {'ok', ARGV[4]}
