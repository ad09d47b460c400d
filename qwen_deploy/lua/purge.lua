-- Purge: the given jobs that are still queued on the named queue end `canceled` with error `purged`.
-- KEYS: stats, active, pending. ARGV: prefix, queue, now, ttl, error json, job ids...
-- Returns how many were closed.
--#include common
local n = 0
for i = 6, #ARGV do
  local job = ARGV[1] .. ':job:' .. ARGV[i]
  local f = redis.call('HMGET', job, 'status', 'queue')
  if f[1] == 'queued' and f[2] == ARGV[2] then
    redis.call('HSET', job, 'error', ARGV[5], 'finish_reason', 'canceled', 'cancel', '1')
    close_job(job, job .. ':ev', KEYS[1], KEYS[2], KEYS[3], 'canceled', ARGV[3], ARGV[4])
    n = n + 1
  end
end
return n
