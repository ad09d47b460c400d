-- KEYS: batch, out, chunks-done set, stats. ARGV: chunk start, now, ttl, completed, failed, expired, lines...
-- The batch ends cancelled (cancel asked), expired (lines ended by its completion_window) or completed.
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then return 0 end
if #ARGV > 6 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 7)) end
redis.call('HINCRBY', KEYS[1], 'completed', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[5])
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', KEYS[1], 'expired', ARGV[6]) end
redis.call('HINCRBY', KEYS[4], 'batch_lines:completed', ARGV[4])
redis.call('HINCRBY', KEYS[4], 'batch_lines:failed', ARGV[5])
local left = redis.call('HINCRBY', KEYS[1], 'chunks_left', -1)
if left <= 0 then
  local st = redis.call('HGET', KEYS[1], 'status')
  if st == 'cancelling' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[2])
  elseif tonumber(redis.call('HGET', KEYS[1], 'expired') or '0') > 0 then
    redis.call('HSET', KEYS[1], 'status', 'expired', 'expired_at', ARGV[2], 'completed_at', ARGV[2])
  else
    redis.call('HSET', KEYS[1], 'status', 'completed', 'completed_at', ARGV[2])
  end
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
  redis.call('EXPIRE', KEYS[1] .. ':req', ARGV[3])
end
return 1
