-- Shared by the job scripts. KEYS[1] job hash, KEYS[2] its event stream, KEYS[3] the stats hash,
-- KEYS[4] the active set (non-terminal job ids scored by when the reaper should look at them).
local terminal = {succeeded=true, failed=true, canceled=true, timed_out=true}
local BUCKETS = {--[[BUCKETS]]}
local function observe(name, value)
  redis.call('HINCRBYFLOAT', KEYS[3], name .. '_sum', value)
  redis.call('HINCRBY', KEYS[3], name .. '_count', 1)
  for _, le in ipairs(BUCKETS) do
    if value <= tonumber(le) then redis.call('HINCRBY', KEYS[3], name .. '_bucket:' .. le, 1) end
  end
end
local function close(status, now, ttl)
  redis.call('ZREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
  redis.call('HSET', KEYS[1], 'status', status, 'completed_at', now)
  redis.call('XADD', KEYS[2], '*', 'type', 'done', 'status', status)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  local kind = redis.call('HGET', KEYS[1], 'type') or 'generation'
  redis.call('HINCRBY', KEYS[3], 'jobs:' .. kind .. ':' .. status, 1)
  local started = redis.call('HGET', KEYS[1], 'started_at')
  if started then observe('run_seconds', tonumber(now) - tonumber(started)) end
end
