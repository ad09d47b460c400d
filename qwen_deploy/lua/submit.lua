-- KEYS: job, queue, idem ('' when none), active. ARGV: ttl, max_depth, message, job id, reap at, fields...
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate', ARGV[4]} end
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'duplicate', existing} end
end
local depth = redis.call('LLEN', KEYS[2])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[1], 'message', ARGV[3], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('LPUSH', KEYS[2], ARGV[3])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[1]) end
return {'ok', ARGV[4]}
